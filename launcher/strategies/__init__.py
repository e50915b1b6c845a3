"""How the processes share the work: DDP (base), DeepSpeed ZeRO, FSDP, and the choice (select)."""
