"""A facility's gateway of several nodes, sharing its sessions in etcd (issue 12).

layout.py (what is kept where), membership.py (a node's lease: its fence),
view.py (a node's watched copy of the keys), placement.py (which node carries which
connection), manager.py (the RPC verbs), reconcile.py (what each node does on its own).
"""
