"""Prefix-affinity routing: send a conversation's next turn to the replica that already holds its prefix.

Two layers, so the decision can be tested as a table without Ray:

- Pure: `prefix_blocks` turns a request into a hash chain over its leading
  text blocks (block k's hash covers everything before it, like vLLM's
  prefix-cache block hashes), `PrefixTable` remembers which block hashes each
  replica was sent and where each prompt ended (a bounded LRU per replica),
  and `choose` picks a replica from `Candidate`s (what each holds of this
  request, its queue length).
- Ray: `PrefixAffinityRouter` is a thin `ray.serve.request_router.RequestRouter`
  that feeds the pure layer from Ray's replica set and queue-length cache.
  Ray instantiates it inside whichever process holds the DeploymentHandle (the
  gateway), so the key is computed from the `GenerationRequest` itself: clients
  that send nothing special still get affinity.

The key is computed from the request's own text, not the engine's tokens: the
router runs in the gateway, which has no tokenizer, and all it needs is a
representation in which a conversation's next turn starts with the previous
turn's prompt. Chat messages are rendered one after another with their roles,
so appending turns keeps every earlier block's hash.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from serve_apps.engines.types import GenerationRequest

# 64 characters is about 16 tokens: fine-grained enough that a short turn
# still adds a block, coarse enough that hashing a 16 k-character prompt is a
# few hundred blake2b calls (tens of microseconds).
DEFAULT_BLOCK_CHARS = 64
# Only the first blocks are hashed: 256 × 64 characters is far more than it
# takes to tell conversations apart, and it bounds the per-request cost.
DEFAULT_MAX_BLOCKS = 256
# Per replica; 16-byte keys, so about 10 MB per replica at most. A hint, not a
# mirror of the engine's cache: stale entries only cost a missed preference.
DEFAULT_TABLE_BLOCKS = 65_536
DEFAULT_MAX_QUEUE = 8
# A pick that never reached a replica (its caller gave up) stops counting as load after this long.
PICK_TTL_S = 30.0

# Shared mode: a new-to-this-gateway conversation goes to its home replica
# unless that one has more than this many requests above the least loaded.
HOME_SLACK = 1
# The conversation key covers the prompt up to the end of its first user
# message (a raw prompt: this many characters), which every later turn repeats.
CONVERSATION_KEY_CHARS = 4096

Reason = Literal["affinity", "overloaded", "no_match", "home"]


# -- the key ----------------------------------------------------------------------------------

def prefix_text(request: GenerationRequest) -> str:
    """The request as prefix-preserving text: tools, then each message in order, or the raw prompt."""
    if request.prompt is not None:
        return request.prompt
    parts: list[str] = []
    if request.tools:
        specs = [{"name": t.name, "description": t.description, "parameters": t.parameters} for t in request.tools]
        parts.append("\x1etools\x1f" + json.dumps(specs, sort_keys=True))
    for m in request.messages:
        calls = "".join(f"\x1d{c.id}\x1f{c.name}\x1f{c.arguments}" for c in m.tool_calls)
        parts.append(f"\x1e{m.role}\x1f{m.name or ''}\x1f{m.tool_call_id or ''}\x1f{m.content}{calls}")
    return "".join(parts)


def prefix_blocks(text: str, namespace: str, *, block_chars: int = DEFAULT_BLOCK_CHARS,
                  max_blocks: int = DEFAULT_MAX_BLOCKS) -> tuple[bytes, ...]:
    """Hash chain over the first `max_blocks` whole blocks of `text`; a trailing partial block is not hashed."""
    if block_chars < 1 or max_blocks < 0:
        raise ValueError("block_chars must be >= 1 and max_blocks >= 0")
    out: list[bytes] = []
    prev = hashlib.blake2b(namespace.encode(), digest_size=16).digest()
    count = min(len(text) // block_chars, max_blocks)
    for i in range(count):
        h = hashlib.blake2b(prev, digest_size=16)
        h.update(text[i * block_chars:(i + 1) * block_chars].encode())
        prev = h.digest()
        out.append(prev)
    return tuple(out)


def conversation_key(request: GenerationRequest) -> bytes:
    """What every turn of one conversation shares and other conversations do not: the same on every gateway.

    Tools, then the messages up to and including the first user message (a
    system prompt alone is shared by many conversations); a raw prompt's
    first CONVERSATION_KEY_CHARS characters.
    """
    if request.prompt is not None:
        head = request.prompt[:CONVERSATION_KEY_CHARS]
    else:
        first_user = next((i for i, m in enumerate(request.messages) if m.role == "user"), len(request.messages) - 1)
        head = prefix_text(GenerationRequest(request_id="", model=request.model, sampling=request.sampling,
                                             messages=request.messages[:first_user + 1], tools=request.tools))
    return hashlib.blake2b(f"{request.model}\x1e{head}".encode(), digest_size=16).digest()


def home_rank(key: bytes, replica: str) -> bytes:
    """Rendezvous (highest random weight) hashing: the replica with the highest rank is the key's home.

    Every gateway computes the same ranks from the same replica set, and a
    replica joining or leaving moves only the keys whose home it is.
    """
    return hashlib.blake2b(key + replica.encode(), digest_size=8).digest()


def request_blocks(request: GenerationRequest, *, block_chars: int = DEFAULT_BLOCK_CHARS,
                   max_blocks: int = DEFAULT_MAX_BLOCKS) -> tuple[bytes, ...]:
    # The served id is the namespace: a LoRA adapter on the same replicas has its own KV cache.
    return prefix_blocks(prefix_text(request), request.model, block_chars=block_chars, max_blocks=max_blocks)


# -- what each replica holds ------------------------------------------------------------------

class PrefixTable:
    """Which block hashes each replica has been sent, as a bounded LRU per replica.

    Because the hashes are a chain, holding block k implies holding the whole
    prefix up to k, so a match is the longest held leading run. Each block also
    remembers whether a prompt ended there: a request whose held run stops at
    such a block continues a prompt that replica served (a conversation's next
    turn); a run that stops anywhere else is only a prefix shared with other
    requests (a common system prompt) from which this one diverges.
    """

    def __init__(self, capacity_blocks: int = DEFAULT_TABLE_BLOCKS) -> None:
        if capacity_blocks < 1:
            raise ValueError("capacity_blocks must be >= 1")
        self.capacity = capacity_blocks
        self._held: dict[str, OrderedDict[bytes, bool]] = {}  # block → a prompt ended there

    def record(self, replica: str, blocks: Sequence[bytes]) -> None:
        held = self._held.setdefault(replica, OrderedDict())
        last = len(blocks) - 1
        for i, block in enumerate(blocks):
            held[block] = held.get(block, False) or i == last
            held.move_to_end(block)
        while len(held) > self.capacity:
            held.popitem(last=False)

    def lookup(self, replica: str, blocks: Sequence[bytes]) -> tuple[int, bool]:
        """(leading blocks held, whether a prompt sent to `replica` ended at the last of them)."""
        held = self._held.get(replica)
        if not held:
            return 0, False
        # A linear scan: the chain breaks at the first miss, and the common
        # case (a growing conversation) matches all but the last few blocks.
        n = 0
        for block in blocks:
            if block not in held:
                break
            n += 1
        return n, n > 0 and held[blocks[n - 1]]

    def held(self, replica: str) -> int:
        return len(self._held.get(replica, ()))

    def drop(self, replica: str) -> None:
        self._held.pop(replica, None)

    def retain(self, replicas: Iterable[str]) -> None:
        keep = set(replicas)
        for replica in [r for r in self._held if r not in keep]:
            del self._held[replica]


# -- the decision -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Candidate:
    """One replica as the decision sees it."""

    replica: str
    queue_len: int  # requests in flight or queued there (Ray's ongoing-request count)
    matched: int = 0  # leading blocks of this request it holds
    continues: bool = False  # those blocks end where a prompt sent there ended (see PrefixTable)
    held: int = 0  # blocks it holds in all: spreads new conversations
    last_routed: int = 0  # sequence number of the last request sent there (0 = never)
    rank: bytes = b""  # shared mode: `home_rank` of this request's conversation here (b"": not shared)


@dataclass(frozen=True)
class Choice:
    replica: str
    reason: Reason


def _spread_key(c: Candidate) -> tuple[int, int, int, int, str]:
    # A new conversation: among equally loaded replicas the emptier table, so
    # conversations spread even when nothing is queued; then any shared prefix
    # it holds; then the one that waited longest, so equal replicas take turns.
    return (c.queue_len, c.held, -c.matched, c.last_routed, c.replica)


def _relieve_key(c: Candidate) -> tuple[int, int, int, int, str]:
    # The preferred replica is too busy: the least loaded, but between equally
    # loaded ones keep the longer prefix (moving costs cache and gains nothing).
    return (c.queue_len, -c.matched, c.held, c.last_routed, c.replica)


def choose(candidates: Sequence[Candidate], max_queue: int) -> Choice:
    """Pick a replica for one request.

    Contract:
    - Affinity: among replicas the request continues (`continues`: it extends
      a prompt they were sent), the one holding the longest prefix gets it,
      while its queue is at most `max_queue`.
    - A prefix the request merely shares (a system prompt common to many
      conversations, from which it diverges) prefers nobody: otherwise the
      first replica to see a shared prompt would attract every new
      conversation until its queue overflowed.
    - Shared mode (candidates carry a `rank`: several gateways route to
      these replicas, each with its own table): a conversation this gateway
      has not seen goes to its home replica, the highest `rank`, while that
      one is within HOME_SLACK requests of the least loaded and at most
      `max_queue` ("home"). Every gateway picks the same home, so a
      conversation whose turns land on different gateways stays together.
    - Otherwise the least-loaded replica (`reason` says why: "overloaded" when
      the preferred one was over `max_queue`, "no_match" when none was
      preferred), ties broken as in `_relieve_key` and `_spread_key`.
    - Deterministic: the same candidates, in any order, give the same choice.
    """
    if not candidates:
        raise ValueError("no candidate replicas")
    if max_queue < 0:
        raise ValueError("max_queue must be >= 0")
    continuing = [c for c in candidates if c.continues and c.matched > 0]
    if not continuing:
        if all(c.rank for c in candidates):
            home = max(candidates, key=lambda c: (c.rank, c.replica))
            least = min(c.queue_len for c in candidates)
            if home.queue_len <= min(least + HOME_SLACK, max_queue):
                return Choice(home.replica, "home")
        return Choice(min(candidates, key=_spread_key).replica, "no_match")
    preferred = min(continuing, key=lambda c: (-c.matched, c.queue_len, c.held, c.last_routed, c.replica))
    if preferred.queue_len <= max_queue:
        return Choice(preferred.replica, "affinity")
    return Choice(min(candidates, key=_relieve_key).replica, "overloaded")


# -- the Ray adapter --------------------------------------------------------------------------

def _generation_request(pending: PendingRequest | None) -> GenerationRequest | None:
    if pending is None:
        return None
    for arg in pending.args:
        if isinstance(arg, GenerationRequest):
            return arg
    return None


class PrefixAffinityRouter(RequestRouter):
    """Ray Serve request router: `choose` over the deployment's replicas.

    Returns two ranks: the chosen replica, then all the others. Ray tries the
    first rank and moves to the second (least loaded among them, probing
    queue lengths) only if the chosen replica rejects the request because it
    is at `max_ongoing_requests`. Calls that carry no GenerationRequest
    (`ready`, `count_tokens`, `embed`, `stats`) have no key and go to the
    least-loaded replica.

    State is per router instance, i.e. per gateway replica: each gateway learns
    its own table from the requests it routes. With several gateway replicas
    (`shared=True`, set when the gateway can have more than one) a
    conversation this gateway has not seen goes to its rendezvous-hashed
    home replica, which every gateway agrees on, so its turns meet again
    wherever HAProxy sends them. A wrong guess costs cache hits, never
    correctness.

    Ray runs `choose_replicas` for a burst of requests before any of them is
    sent, so its queue-length cache does not yet count the burst. The router
    therefore records each pick at once (the request's blocks in the table and
    one unconfirmed request in that replica's queue) and settles it when Ray
    reports where the request really went (`on_request_routed`).
    """

    # Named keywords instead of the base's **kwargs: a misspelt router kwarg in
    # the deployment config fails when the router starts instead of being ignored.
    def initialize_state(self, max_queue: int = DEFAULT_MAX_QUEUE,  # type: ignore[override]
                         block_chars: int = DEFAULT_BLOCK_CHARS, max_blocks: int = DEFAULT_MAX_BLOCKS,
                         table_blocks: int = DEFAULT_TABLE_BLOCKS, shared: bool = False) -> None:
        self._max_queue = int(max_queue)
        self._shared = bool(shared)
        self._block_chars = int(block_chars)
        self._max_blocks = int(max_blocks)
        self._table = PrefixTable(int(table_blocks))
        self._seq = 0
        self._last_routed: dict[str, int] = {}
        # internal request id → (replica, when picked, the request's blocks): the blocks are kept so
        # on_request_routed need not render and hash a long prompt a second time.
        self._picks: dict[str, tuple[str, float, tuple[bytes, ...]]] = {}

    def _blocks(self, request: GenerationRequest | None) -> tuple[bytes, ...]:
        if request is None:
            return ()
        return request_blocks(request, block_chars=self._block_chars, max_blocks=self._max_blocks)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        request = _generation_request(pending_request)
        blocks = self._blocks(request)
        key = conversation_key(request) if self._shared and request is not None else None
        queue_lens: Mapping[ReplicaID, int | None] = {
            r.replica_id: self.replica_queue_len_cache.get(r.replica_id) for r in candidate_replicas}
        picked = self._unconfirmed()
        by_key: dict[str, RunningReplica] = {}
        candidates: list[Candidate] = []
        for r in candidate_replicas:
            rid = r.replica_id.unique_id
            by_key[rid] = r
            # An unknown queue length (no traffic for the cache's 10 s) means
            # an idle replica in practice; Ray probes it before sending anyway.
            matched, continues = self._table.lookup(rid, blocks)
            candidates.append(Candidate(rid, (queue_lens[r.replica_id] or 0) + picked[rid], matched, continues,
                                        self._table.held(rid), self._last_routed.get(rid, 0),
                                        home_rank(key, rid) if key is not None else b""))
        choice = choose(candidates, self._max_queue)
        self._note(pending_request, choice.replica, blocks)
        chosen = by_key[choice.replica]
        rest = [r for r in candidate_replicas if r is not chosen]
        return [[chosen], rest] if rest else [[chosen]]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        key = replica_id.unique_id
        # Now in Ray's queue-length cache (on_send_request): no longer an unconfirmed pick.
        pick = self._picks.pop(pending_request.metadata.internal_request_id, None)
        # Where it really went (a full first choice sends it to the second rank).
        self._seq += 1
        self._last_routed[key] = self._seq
        blocks = pick[2] if pick is not None else self._blocks(_generation_request(pending_request))
        if blocks:
            self._table.record(key, blocks)

    def _note(self, pending: PendingRequest | None, replica: str, blocks: tuple[bytes, ...]) -> None:
        """Count a pick before Ray sends it, so the rest of a burst sees it."""
        self._seq += 1
        self._last_routed[replica] = self._seq
        if blocks:
            self._table.record(replica, blocks)
        if pending is not None:
            # Keyed by request: a retried pick of the same request replaces, never adds.
            self._picks[pending.metadata.internal_request_id] = (replica, time.monotonic(), blocks)

    def _unconfirmed(self) -> Counter[str]:
        cutoff = time.monotonic() - PICK_TTL_S
        for rid in [rid for rid, (_, when, _) in self._picks.items() if when < cutoff]:
            del self._picks[rid]
        return Counter(replica for replica, _, _ in self._picks.values())

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        live = [r.replica_id.unique_id for r in replicas]
        # A replacement replica starts with an empty cache: forget the old one's prefixes.
        self._table.retain(live)
        self._last_routed = {k: v for k, v in self._last_routed.items() if k in live}

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._table.drop(replica_id.unique_id)


ROUTER_PATH = f"{PrefixAffinityRouter.__module__}.{PrefixAffinityRouter.__qualname__}"
