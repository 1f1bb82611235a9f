from streamrec.cli import app

app(prog_name="streamrec")
