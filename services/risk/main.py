"""Entry point: python -m services.risk.main"""

from services.chassis import run

from .server import build_server

if __name__ == "__main__":
    run("risk", build_server)
