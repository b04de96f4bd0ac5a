"""The server's database.

Table models and engine, the queries the server runs, and the device hot path.
"""
