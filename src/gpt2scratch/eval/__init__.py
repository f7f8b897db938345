"""Evaluation: perplexity and multiple choice by log-likelihood, and the lm-evaluation-harness backend."""
