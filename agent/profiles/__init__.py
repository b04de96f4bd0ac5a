"""Firmware profiles: one TOML per board family, and detection of the board the agent runs on."""
