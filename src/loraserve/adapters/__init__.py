"""Adapters: naming (``ref``), sources (hub, local, s3), checks (``validate``),
the bounded disk cache (``store``) and the name → engine mapping (``registry``).
Only this package touches the adapter cache folder."""
