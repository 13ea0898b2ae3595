# One-time set-up steps of a test OpenStack (Keystone + Glance), each in one process of
# Debian's Python (every separate CLI call would pay ~2 s of start-up).
#   openstack_setup.py keystone CONF DATA PASSWORD URL   fernet/credential keys, db, bootstrap
#                                                         (keystone-manage, a process a step)
#   openstack_setup.py accounts URL ADMIN_PW GLANCE_PW AGENT_PW GLANCE_URL
#                                  a service project and role, a glance user, a "sites"
#                                  project with an "agent" member, the image service and
#                                  its endpoints
#   openstack_setup.py glance-db CONF                     glance-manage db_sync
import json
import sqlite3
import sys


def keystone(conf, data, password, url):
    import subprocess

    # keystone-manage parses its configuration once per process: one process per step.
    def run(*args):
        subprocess.run(["/usr/bin/keystone-manage", "--config-file", conf, *args], check=True,
                       stdout=subprocess.DEVNULL)

    run("fernet_setup", "--keystone-user", "root", "--keystone-group", "root")
    run("credential_setup", "--keystone-user", "root", "--keystone-group", "root")
    run("db_sync")
    # sqlite without WAL fails at random with "database is locked".
    sqlite3.connect(data + "/keystone.sqlite").execute("PRAGMA journal_mode=WAL").close()
    run("bootstrap", "--bootstrap-password", password, "--bootstrap-region-id", "RegionOne",
        "--bootstrap-admin-url", url, "--bootstrap-internal-url", url,
        "--bootstrap-public-url", url)


def accounts(url, admin_pw, glance_pw, agent_pw, glance_url):
    import requests

    def auth(user, pw, project):
        body = {"auth": {"identity": {"methods": ["password"], "password": {"user": {
            "name": user, "domain": {"id": "default"}, "password": pw}}},
            "scope": {"project": {"name": project, "domain": {"id": "default"}}}}}
        r = requests.post(url + "/auth/tokens", json=body)
        r.raise_for_status()
        return r.headers["X-Subject-Token"]

    h = {"X-Auth-Token": auth("admin", admin_pw, "admin")}

    def post(path, kind, body):
        r = requests.post(url + path, json={kind: body}, headers=h)
        r.raise_for_status()
        return r.json()[kind]["id"]

    def find(path, kind, name):
        r = requests.get(url + path, params={"name": name}, headers=h)
        r.raise_for_status()
        return r.json()[kind][0]["id"]

    service_role = post("/roles", "role", {"name": "service"})
    admin_role = find("/roles", "roles", "admin")
    member_role = find("/roles", "roles", "member")
    service = post("/projects", "project", {"name": "service", "domain_id": "default"})
    sites = post("/projects", "project", {"name": "sites", "domain_id": "default"})
    glance = post("/users", "user", {"name": "glance", "password": glance_pw,
                                     "domain_id": "default"})
    agent = post("/users", "user", {"name": "agent", "password": agent_pw,
                                    "domain_id": "default", "default_project_id": sites})
    for project, user, role in [(service, glance, service_role), (service, glance, admin_role),
                                (sites, agent, member_role)]:
        r = requests.put(f"{url}/projects/{project}/users/{user}/roles/{role}", headers=h)
        r.raise_for_status()
    image = post("/services", "service", {"type": "image", "name": "glance"})
    for interface in ["public", "internal", "admin"]:
        post("/endpoints", "endpoint", {"service_id": image, "interface": interface,
                                        "url": glance_url, "region_id": "RegionOne"})
    print(json.dumps({"sites": sites, "agent": agent}))


def glance_db(conf):
    from glance.cmd import manage

    sys.argv = ["glance-manage", "--config-file", conf, "db_sync"]
    try:
        manage.main()
    except SystemExit as e:
        if e.code not in (None, 0):
            raise


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"keystone": keystone, "accounts": accounts, "glance-db": glance_db}[cmd](*args)
