"""A rank started by torchrun: `torchrun ... -m paralab.core.rank --controller HOST:PORT`.

Its own module, so that neither the rank loop (core.worker) nor core.remote has to be
run as __main__: messages pickled by the controller name `paralab.core.remote`'s classes,
and a __main__ copy of that module would hold different ones.
"""

import os
import sys

if __name__ == "__main__":
    from paralab.core.remote import remote_main

    code = remote_main()
    sys.stdout.flush()
    sys.stderr.flush()
    # End as forked ranks do, without the interpreter's teardown: destroying torch's
    # static objects at exit can abort ("terminate called without an active exception").
    os._exit(code)
