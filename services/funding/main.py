"""Entry point: python -m services.funding.main"""

from services.chassis import run

from .server import build_server

if __name__ == "__main__":
    run("funding", build_server)
