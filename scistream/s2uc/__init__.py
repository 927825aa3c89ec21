"""s2uc: the SciStream user client."""

import os

# gRPC's C core logs TLS handshake failures at INFO straight to stderr; the CLI
# already reports them as one line, so keep the core quiet unless asked.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
