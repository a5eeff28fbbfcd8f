"""lbcc targets, one package each; found through :mod:`lbcc.target`'s registry."""
