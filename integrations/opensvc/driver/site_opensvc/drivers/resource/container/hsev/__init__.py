# container.hsev: a HyperSEV confidential VM as a resource of the OpenSVC
# v2 agent.
#
# Copyright the HyperSEV authors.
#
# This program is free software; you can redistribute it and/or modify it
# under the terms of the GNU General Public License version 2 as published
# by the Free Software Foundation (see LICENSE in the folder this package
# lives in). It subclasses the OpenSVC agent's resource classes, which are
# GPL-2.0 themselves; nothing else in HyperSEV uses it.
"""
The container.hsev resource driver.

Every action runs HyperSEV's launcher, ``hsev-opensvc`` (the same program
an ``app`` resource of type ``forking`` calls), with the resource's
keywords turned into its ``HSEV_*`` environment:

- ``start`` blocks until the VM runs and, for an encrypted disk, until the
  key broker released the disk key to the attested guest;
- ``stop`` is an ACPI shutdown, then a forced stop when it does not end in
  ``stop_timeout``; a stop that fails raises, so that the agent never takes
  a running VM for a stopped one;
- ``provision`` creates the VM in the pool (then starts it), ``unprovision``
  stops and deletes it with its disks (its disk key revoked);
- the status is the launcher's: up only on the node that started it.

The driver never prints nor passes on a token: the pool's hsev config file
(``pool``) names the token file.
"""

import os
import subprocess

import core.exceptions as ex
import core.status
from core.objects.svcdict import KEYS
from env import Env
from utilities.lazy import lazy
from utilities.proc import which

from drivers.resource.container import (
    BaseContainer,
    KW_NAME,
    KW_START_TIMEOUT,
    KW_STOP_TIMEOUT,
)

DRIVER_GROUP = "container"
DRIVER_BASENAME = "hsev"

# The launcher's environment, keyword by keyword.
FIELD_VARIABLES = (
    ("image", "HSEV_IMAGE"),
    ("vcpus", "HSEV_VCPUS"),
    ("mem", "HSEV_MEMORY"),
    ("mode", "HSEV_MODE"),
    ("policy", "HSEV_POLICY"),
    ("encrypted_disk", "HSEV_ENCRYPTED_DISK"),
    ("disks", "HSEV_DISKS"),
    ("forwards", "HSEV_FORWARDS"),
    ("vcpu_type", "HSEV_VCPU_TYPE"),
)

# Inherited variables the launcher may read: how to reach the pool. Any
# other HSEV_* of the agent's environment is dropped, so that the
# keywords alone say what the VM is.
CONNECTION_VARIABLES = (
    "HSEV_ENDPOINT",
    "HSEV_CA",
    "HSEV_TOKEN",
    "HSEV_TOKEN_FILE",
    "HSEV_CONFIG",
)

# How long a status or a provisioned check may take.
QUERY_TIMEOUT = 60

KEYWORDS = [
    KW_NAME,
    KW_START_TIMEOUT,
    KW_STOP_TIMEOUT,
    {
        "keyword": "pool",
        "at": True,
        "text": "The hsev client config file of the HyperSEV pool: its endpoint, "
                "the CA of its TLS certificate, its token file (``endpoint``, ``ca``, "
                "``token_file``). Without it, the agent's HSEV_ENDPOINT and "
                "HSEV_TOKEN_FILE, or hsev's default config.",
        "example": "/etc/hsev/pool.toml",
    },
    {
        "keyword": "spec",
        "at": True,
        "text": "The VM's spec file, as ``hsev vm apply`` reads it (TOML, or JSON for "
                "a .json name). Replaces the image, vcpus, mem, mode, policy, "
                "encrypted_disk, disks, forwards and vcpu_type keywords.",
        "example": "/etc/hsev/vault.toml",
    },
    {
        "keyword": "image",
        "at": True,
        "text": "The id or name of the image the VM boots (``hsev image list``).",
        "example": "debian",
    },
    {
        "keyword": "vcpus",
        "at": True,
        "convert": "integer",
        "text": "The VM's vCPUs.",
        "example": "2",
    },
    {
        "keyword": "mem",
        "at": True,
        "convert": "integer",
        "text": "The VM's memory, in MiB.",
        "example": "1024",
    },
    {
        "keyword": "mode",
        "at": True,
        "candidates": ["none", "sev", "sev-es", "sev-snp"],
        "default": "sev-snp",
        "text": "How the VM's memory is protected.",
    },
    {
        "keyword": "policy",
        "at": True,
        "text": "The SEV-SNP guest policy, in hex (default 0x30000: no debug, no "
                "migration agent).",
        "example": "0x30000",
    },
    {
        "keyword": "encrypted_disk",
        "at": True,
        "convert": "integer",
        "text": "The size in MiB of a LUKS2 data disk whose key the key broker "
                "releases only to the attested guest (sev-snp).",
        "example": "1024",
    },
    {
        "keyword": "disks",
        "at": True,
        "convert": "list",
        "text": "Extra empty data disks, ``NAME:SIZE_MIB`` each.",
        "example": "data:1024 logs:256",
    },
    {
        "keyword": "forwards",
        "at": True,
        "convert": "list",
        "text": "Host loopback ports forwarded into the guest, ``HOSTPORT:GUESTPORT`` each.",
        "example": "2222:22",
    },
    {
        "keyword": "vcpu_type",
        "at": True,
        "text": "The vCPU model the launch measurement uses (default: the host's).",
        "example": "EPYC-v4",
    },
    {
        "keyword": "host",
        "at": True,
        "text": "The hypervisor host the VM must run on; ``local``: the node the "
                "agent runs on (its disks then need shared storage to fail over).",
        "example": "local",
    },
    {
        "keyword": "launcher",
        "at": True,
        "default": "hsev-opensvc",
        "text": "The HyperSEV launcher: its path, or a name looked up in PATH.",
    },
    {
        "keyword": "wipe",
        "at": True,
        "convert": "boolean",
        "candidates": (True, False),
        "default": False,
        "text": "Overwrite the VM's disks when unprovisioning it.",
    },
]

KEYS.register_driver(
    DRIVER_GROUP,
    DRIVER_BASENAME,
    name=__name__,
    keywords=KEYWORDS,
)


def driver_capabilities(node=None):
    if which("hsev-opensvc"):
        return ["container.hsev"]
    return []


class ContainerHsev(BaseContainer):
    """
    A HyperSEV VM, through the hsev-opensvc launcher.
    """

    def __init__(self,
                 pool=None,
                 spec=None,
                 image=None,
                 vcpus=None,
                 mem=None,
                 mode="sev-snp",
                 policy=None,
                 encrypted_disk=None,
                 disks=None,
                 forwards=None,
                 vcpu_type=None,
                 host=None,
                 launcher="hsev-opensvc",
                 wipe=False,
                 **kwargs):
        super(ContainerHsev, self).__init__(type="container.hsev", **kwargs)
        self.refresh_provisioned_on_provision = True
        self.refresh_provisioned_on_unprovision = True
        self.pool = pool
        self.spec = spec
        self.fields = {
            "image": image,
            "vcpus": vcpus,
            "mem": mem,
            "mode": mode,
            "policy": policy,
            "encrypted_disk": encrypted_disk,
            "disks": disks,
            "forwards": forwards,
            "vcpu_type": vcpu_type,
        }
        self.host = host
        self.launcher = launcher
        self.wipe = wipe
        self.last_status = None

    @lazy
    def runmethod(self):
        # No remote shell into a confidential guest: nothing is encapsulated.
        return None

    @lazy
    def launcher_path(self):
        return which(self.launcher) or self.launcher

    def launcher_env(self):
        env = dict((key, value) for key, value in os.environ.items()
                   if not key.startswith("HSEV_") or key in CONNECTION_VARIABLES)
        env["OPENSVC_RID"] = self.rid
        env["OPENSVC_NAME"] = self.svc.name
        env["OPENSVC_KIND"] = self.svc.kind
        if self.svc.namespace:
            env["OPENSVC_NAMESPACE"] = self.svc.namespace
        env["HSEV_NODE"] = Env.nodename
        if self.raw_name or not self.spec:
            env["HSEV_VM"] = self.name
        if self.pool:
            env["HSEV_CONFIG"] = self.pool
        if self.spec:
            env["HSEV_SPEC"] = self.spec
        else:
            for keyword, variable in FIELD_VARIABLES:
                value = self.fields.get(keyword)
                if value is None or value == "" or value == []:
                    continue
                if isinstance(value, (list, tuple)):
                    value = " ".join(value)
                env[variable] = str(value)
        if self.host:
            env["HSEV_HOST"] = self.host
        env["HSEV_START_TIMEOUT"] = str(max(1, int(self.start_timeout)))
        env["HSEV_STOP_TIMEOUT"] = str(max(1, int(self.stop_timeout)))
        env["HSEV_WIPE"] = "yes" if self.wipe else "no"
        return env

    def run_launcher(self, *args, **kwargs):
        """
        Runs a long action, its output logged line by line as it comes
        (stdout as information, stderr as errors); raises when it fails.
        """
        cmd = [self.launcher_path] + list(args)
        self.log.info("exec %s", " ".join(cmd))
        ret = self.lcall(cmd, env=self.launcher_env(), stdin=self.svc.node.devnull,
                         timeout=kwargs.get("timeout"))
        self.is_up_clear_cache()
        if ret != 0:
            raise ex.Error("%s exited with %d" % (" ".join(cmd), ret))

    def query_launcher(self, action):
        """
        Runs a query (status, provisioned, info): (exit code, stdout, stderr).
        """
        cmd = [self.launcher_path, action]
        try:
            proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, env=self.launcher_env(),
                                  timeout=QUERY_TIMEOUT, universal_newlines=True)
        except subprocess.TimeoutExpired:
            return 2, "", "%s %s did not answer in %d s" % (self.launcher, action, QUERY_TIMEOUT)
        except OSError as exc:
            return 2, "", "cannot run %s: %s" % (self.launcher_path, exc)
        return proc.returncode, proc.stdout.strip(), proc.stderr.strip()

    def launcher_status(self):
        if self.last_status is None:
            self.last_status = self.query_launcher("status")
        return self.last_status

    def is_up_clear_cache(self):
        self.last_status = None

    def is_up(self, nodename=None):
        return self.launcher_status()[0] == 0

    def is_down(self, nodename=None):
        return self.launcher_status()[0] == 1

    def _status(self, verbose=False):
        self.is_up_clear_cache()
        code, out, err = self.launcher_status()
        if code == 0:
            return core.status.UP
        if code == 1:
            if out:
                self.status_log(out, "info")
            return core.status.DOWN
        self.status_log(err or out or "%s status exited with %d" % (self.launcher, code), "warn")
        return core.status.WARN

    def _info(self):
        data = super(ContainerHsev, self)._info()
        code, out, err = self.query_launcher("info")
        if code != 0:
            data.append(["error", err or "%s info exited with %d" % (self.launcher, code)])
            return data
        for line in out.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                data.append([key.strip(), value.strip()])
        return data

    def get_container_info(self):
        info = {"vcpus": "0", "vmem": "0"}
        for key, value in self._info():
            if key == "vcpus":
                info["vcpus"] = value
            elif key == "memory_mib":
                info["vmem"] = value
        return info

    def getaddr(self, cache_fallback=False):
        # The guest has no address the node resolves: the pool reaches it.
        return

    def abort_start(self):
        # The pool runs a VM once: a VM held by another node is restarted
        # for this one by the launcher, not started twice.
        return False

    def operational(self):
        return True

    def check_manual_boot(self):
        return True

    def check_capabilities(self):
        if which(self.launcher_path) is None:
            self.status_log("%s not found (PATH, or the launcher keyword)" % self.launcher)
            return False
        return True

    def container_start(self):
        self.run_launcher("start", timeout=self.start_timeout)

    def container_stop(self):
        self.run_launcher("stop", timeout=self.stop_timeout + 30)

    def container_forcestop(self):
        self.run_launcher("stop", "--force", timeout=self.stop_timeout + 30)

    def provisioner(self):
        self.run_launcher("provision", timeout=self.start_timeout)
        self.log.info("provisioned")
        return True

    def provisioned(self):
        code, out, err = self.query_launcher("provisioned")
        if code == 0:
            return True
        if code == 1:
            return False
        raise ex.Error(err or out or "%s provisioned exited with %d" % (self.launcher, code))

    def unprovisioner(self):
        self.run_launcher("unprovision", timeout=self.stop_timeout + 120)
        self.log.info("unprovisioned")
        return True

    def unprovisioner_shared_non_leader(self):
        # The leader deletes the pool's VM; the other nodes have nothing.
        return
