"""Entry point: python -m services.reflection.main"""

from services.chassis import run

from .server import build_server

if __name__ == "__main__":
    run("reflection", build_server)
