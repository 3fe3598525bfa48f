"""Entry point: python -m services.marketdata.main"""

from services.chassis import run

from .server import build_server

if __name__ == "__main__":
    run("marketdata", build_server)
