"""Deploy: a Triton model repository (``triton``) and the local text-in, answer-out twin (``run``).

Both answer with ``serving.py``, the standalone file (numpy and ``tokenizers`` only) that the repository's
Python models are copies of. Nothing is imported here, so importing ``mbexport.deploy.serving`` stays light.
"""
