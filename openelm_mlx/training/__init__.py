"""Training: pretrain, lora and finetune on one package.

- settings.py: the settings every command shares (`RunSettings`: schedule, optimizer, precision, run folder;
  `ExampleSettings` for the JSONL runs), the older names as aliases, YAML files of settings.
- loop.py: the `Trainer` (float32 master weights, accumulation, clipping, data parallelism, divergence check),
  optimizers and schedule, callbacks, checkpoints, the run folder and `run_training`.
- trainable.py: what a run trains, as a strategy: `AdapterWeights` (lora) or `ModelWeights` (finetune, pretrain).
- tune.py: the fine-tuning run on JSONL examples, taking a trainable strategy (lora and finetune).
- lora.py: LoRA settings and recipe; adapters.py: the adapter layers (swap, save, load, fuse).
- finetune.py: full fine-tuning settings and its entry point.
- pretrain.py: pretraining from scratch or from a model (`init_from`), and the tokenizer trainer.
- memory.py: the memory plan checked before any step.
- data.py: token files for pretraining, JSONL examples for fine-tuning.
The loss itself is `model/loss.py` (evaluation uses it too).
"""
