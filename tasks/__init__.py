"""LightningModules, one per task, wiring the shared backbone to an adapter, head, loss and metrics."""
