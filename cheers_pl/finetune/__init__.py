"""Fine-tuning a trained CHEERS model on your own data: LoRA adapters through ``peft``.

* :mod:`cheers_pl.finetune.lora`: :class:`~cheers_pl.finetune.lora.LoraSpec` (the ``lora:`` config
  block), injecting, merging, the adapter / base states and the base hash;
* :mod:`cheers_pl.finetune.training`: what a training stage does with ``lora`` (adapters-only
  checkpoints that name their base, the checks on resume).

``experiments/finetune/lora.yaml`` is the overlay; ``cheers export ADAPTER.ckpt --merge-lora``
writes the merged model; ``--model ADAPTER.ckpt`` (answer / generate / edit) loads the pair.
"""
