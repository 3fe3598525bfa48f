"""Entry point: python -m services.match.main"""

from services.chassis import run

from .server import build_server

if __name__ == "__main__":
    run("match", build_server)
