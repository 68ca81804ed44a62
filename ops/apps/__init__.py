"""Example applications that run on tcpcp: the passing demo server (counting echo + HTTP)."""
