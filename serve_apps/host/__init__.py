"""The process and the machine it runs on: which CPUs compute and which serve, ports, the HTTP server's
connection deadlines, and the health port."""
