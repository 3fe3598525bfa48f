"""Entry point: python -m services.auth.main"""

from services.chassis import run

from .server import build_server

if __name__ == "__main__":
    run("auth", build_server)
