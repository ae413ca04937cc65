"""The trainer: run setup (model, mesh, shardings, tokenizer), train state, the jitted step, checkpoints,
the training loop (`sft.trainer.loop.train_and_evaluate`). Import the modules you need: this package
imports nothing, so serving can use the run setup without loading the loop."""
