"""Plots and tables. Never imports training code."""
