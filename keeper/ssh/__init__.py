"""SSH server sessions in Domain R that move, keys and all, with the domain.

`keeper.ssh.movable` is the one module that knows asyncssh's internals (pinned to
one exact asyncssh version); everything else talks to it through plain data.
"""
