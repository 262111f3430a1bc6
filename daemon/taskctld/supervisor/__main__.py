"""`python -m taskctld.supervisor FD RUN_DIR SOCKET CGROUP_HOME`: see `launch.main`."""

import sys

from taskctld.supervisor.launch import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
