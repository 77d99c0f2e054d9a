"""What each process does: roles/ffn.py (the FFN ranks' loop), roles/attention.py (the
attention ranks' model runner), roles/launcher.py (start and supervise ranks on one host)."""
