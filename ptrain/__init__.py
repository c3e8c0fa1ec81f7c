"""ptrain: fine-tune video diffusion transformers with torchrun on raw torch.distributed.

The layers, each importing only from those above it (tests/test_architecture.py checks there is no import
cycle):

Foundations. `errors.py` (ConfigError), `interrupts.py` (Ctrl-C / SIGTERM outside the training loop: the phase
named, what a rerun does), `config.py` (every flag: dataclass groups validated where they are
defined, parsed by tyro, TOML presets; other trainers' flag names are tyro aliases), `compat.py` (other
trainers' value-less switches, value spellings and rejected flags), `collective.py` (one decision on every
rank), `safe_load.py` (DCP and per-rank files without unrestricted unpickling), `metrics.py`, `flops.py`
(model and hardware FLOPs per training shape, counted on fake tensors, for mfu / hfu).

Parallelism, `parallel/`. `dims.py` (ParallelDims -> DeviceMesh; cuda+nccl or cpu+gloo), `fsdp.py`
(fully_shard / replicate), `activation.py`, `compile.py`, `context.py` (Ulysses and ring attention),
`ring_check.py` (the ring's ranks in one process against full SDPA: the one-GPU check of its CUDA kernels),
`names.py` (parameter names without wrapper prefixes).

Data, `data/`. `sources.py` (dataset formats -> records), `video.py` (decode, frame sampling, resize/crop),
`buckets.py` (shape buckets), `sampler.py` (the global batch order, independent of the layout),
`precompute.py` (cached latents and text embeddings).

Training state. `objectives.py` (flow matching, v-prediction), `optim.py`, `ema.py`, `checkpoint.py` (a
Checkpointer over Stateful objects: DCP, atomic commit, rotation, resume checks), `export.py` (diffusers-format
weights, staged).

Models, `models/`. `registry.py` (--model_name -> module; get_spec), `spec.py` (the ModelSpec contract; bind()
returns a spec bound to loaded components and a train mode), `conditioning.py` (i2v / inpaint masks), one file
per family (`ltx_video.py`, `cogvideox.py`, `hunyuan_video.py`, `wan.py`); `export_comfyui.py` and
`validation.py` use the specs.

The step. `parallelize.py` turns (config, bound spec, mesh) into the trainable, parallelized transformer with
its optimizer, schedule and EMA; `step.py` runs one micro-batch (inputs -> objective -> the mode's conditioning
-> loss -> backward). Both the trainer and the memory planner call exactly these.

Entry points. `trainer.py` (`train(cfg)`: plan_run, then a Trainer's build_* and its loop), `dry_run.py`,
`planner.py` (peak memory on fake tensors, no GPU), `__main__.py` (`torchrun -m ptrain`; exit codes), `cli.py`
(the `ptrain` command); `hub.py` turns hub ids into snapshot folders of the Hugging Face cache before anything
reads them; `testing/tiny.py` writes tiny checkpoints and synthetic videos for tests and the demo,
`testing/hub_cache.py` a hub cache filled from local folders.
"""
