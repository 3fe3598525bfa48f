"""Entry point: python -m services.order.main"""

from services.chassis import run

from .server import build_server

if __name__ == "__main__":
    run("order", build_server)
