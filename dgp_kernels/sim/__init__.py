"""Thin collaborative-learning simulator (FedSGD / FedAvg) and the models it trains."""
