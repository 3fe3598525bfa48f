"""funding: deposit and withdrawal sagas and their step logs."""
