# Run one Swift server (account, container, object or proxy) with every file under the
# test's own directory: set_swift_dir moves swift.conf and the rings there (a server's
# swift_dir option alone moves only the rings).
#   swift_server.py APP SWIFT_DIR CONF         serve APP
#   swift_server.py rings SWIFT_DIR A C O      build the account/container/object rings of
#                                              one device each (ports A, C, O), in one process
import sys

from swift.common import storage_policy, utils

app, swift_dir = sys.argv[1:3]
utils.set_swift_dir(swift_dir)

if app == "rings":
    import os

    from swift.common.ring import RingBuilder

    for ring, port in zip(["account", "container", "object"], sys.argv[3:6]):
        b = RingBuilder(10, 1, 1)
        b.add_dev({"region": 1, "zone": 1, "ip": "127.0.0.1", "port": int(port),
                   "device": "d1", "weight": 100})
        b.rebalance()
        b.save(os.path.join(swift_dir, ring + ".builder"))
        b.get_ring().save(os.path.join(swift_dir, ring + ".ring.gz"))
    sys.exit(0)

storage_policy.reload_storage_policies()

from swift.common.wsgi import run_wsgi  # noqa: E402

kwargs = {}
if app == "object-server":
    from swift.obj.server import global_conf_callback

    kwargs["global_conf_callback"] = global_conf_callback
sys.exit(run_wsgi(sys.argv[3], app, **kwargs))
