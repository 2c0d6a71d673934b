"""The CLI's side of the HTTP API: a client (`client`), rendering (`display`), commands."""
