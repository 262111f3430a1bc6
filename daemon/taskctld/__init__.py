"""taskctld: the taskctl daemon (store, dispatcher, runner, launcher and workers, server)."""
