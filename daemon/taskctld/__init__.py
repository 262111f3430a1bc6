"""taskctld: the taskctl daemon (store, dispatcher, runner and supervisor, server)."""
