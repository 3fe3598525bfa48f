"""Entry point: python -m services.ledger.main"""

from services.chassis import run

from .server import build_server

if __name__ == "__main__":
    run("ledger", build_server)
