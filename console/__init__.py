"""`afd console`: a Gradio web console over afd-compile.

launcher.py starts and stops the ranks of a deployment as supervised subprocesses, chat.py talks
to the running server's OpenAI API, traces.py records and plots an AFD timeline, bench.py runs
`afd bench` scenarios, and app.py puts them on tabs. validate.py checks every form input.
"""
