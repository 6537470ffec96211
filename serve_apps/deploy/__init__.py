"""Everything that runs on Ray: the application builder, model replicas, the handle engine, routing, the plan."""
