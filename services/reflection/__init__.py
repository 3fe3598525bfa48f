"""reflection: server reflection for the whole v1 surface, behind the edge."""
