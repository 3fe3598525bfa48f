"""Entry point: python -m services.catalog.main"""

from services.chassis import run

from .server import build_server

if __name__ == "__main__":
    run("catalog", build_server)
