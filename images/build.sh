#!/usr/bin/env bash
# `make image`: builds the minimal guest the tests and the demo boot, into
# $IMAGE_OUT (default images/out), and its manifest:
#
#   firmware/OVMF.fd       edk2 OvmfPkg/AmdSev (SEV-SNP, kernel hashes), built
#                          from Debian's edk2 source package (firmware.sh)
#   boot/vmlinuz           Debian's 6.12 cloud kernel (bookworm-backports)
#   boot/initrd.img        busybox, the guest's kernel modules, /init, the
#                          agent (hsev-agent: attested unlock of the data
#                          disk), cryptsetup and mke2fs (initramfs.sh;
#                          EXTRA_BINARIES / EXTRA_FILES add more)
#   boot/sev-hashes.page   the SNP_KERNEL_HASHES page for that kernel, initrd
#                          and command line (sev_hashes.py)
#   manifest.json          every artifact with its sha256, the command line,
#                          how to boot it, and the expected SNP launch
#                          measurement per vCPU count
#
# Environment: IMAGE_OUT, HSEV (the hsev binary), HSEV_AGENT (the agent,
# default target/release/hsev-agent), VCPU_COUNTS (default
# "1 2 4 8 16"), VCPU_TYPE (default EPYC-v4), GUEST_CMDLINE, GUEST_MODULES,
# EXTRA_BINARIES, EXTRA_FILES, FIRMWARE_BUILD_TYPE (RELEASE or DEBUG).
#
# Inputs are pinned (lib.sh) and cached under .tools/images; a rerun with
# nothing changed takes seconds and rewrites no artifact whose bytes are
# unchanged.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

out=${IMAGE_OUT:-$root/images/out}
hsev=${HSEV:-$root/target/debug/hsev}
agent=${HSEV_AGENT:-$root/target/release/hsev-agent}
vcpu_type=${VCPU_TYPE:-EPYC-v4}
vcpu_counts=(${VCPU_COUNTS:-1 2 4 8 16})
cmdline=${GUEST_CMDLINE:-console=ttyS0 panic=-1 quiet hsev.exit=idle}
marker=HSEV-GUEST-READY

[ -x "$hsev" ] || fail "$hsev is missing: run \`make build\`"
[ -x "$agent" ] || fail "$agent is missing: run \`make image\` (cargo build --release -p hsev-agent)"
for tool in python3 curl gzip cpio dpkg-deb depmod modprobe nasm iasl gcc g++ make mkfs.msdos mcopy strip cryptsetup mke2fs; do
  command -v "$tool" >/dev/null || fail "$tool is missing: run \`make deps\`"
done
python=/usr/bin/python3
[ -x "$python" ] || python=$(command -v python3)

mkdir -p "$cache"
exec 9>"$cache/.lock"
if ! flock -n 9; then
  step "waiting for another image build to finish (lock: $cache/.lock)"
  flock 9
fi

started=$(date +%s)
mkdir -p "$out/firmware" "$out/boot"

step "[1/5] firmware"
"$images/firmware.sh" "$out/firmware/OVMF.fd"

step "[2/5] kernel: $kernel_package $kernel_version"
kernel_root=$(prepare_kernel)
cp "$kernel_root/boot/vmlinuz-$kernel_release" "$out/boot/vmlinuz.partial"
install_if_changed "$out/boot/vmlinuz.partial" "$out/boot/vmlinuz"

step "[3/5] initramfs with $agent${EXTRA_BINARIES:+ (+ $EXTRA_BINARIES)}${EXTRA_FILES:+ (+ $EXTRA_FILES)}"
HSEV_AGENT="$agent" "$images/initramfs.sh" "$out/boot/initrd.img"
guest_tools=$(dpkg-query -W -f '${Package}=${Version} ' cryptsetup-bin e2fsprogs)

step "[4/5] SEV kernel-hashes page (cmdline: $cmdline)"
hashes=$("$python" "$images/sev_hashes.py" --ovmf "$out/firmware/OVMF.fd" \
  --kernel "$out/boot/vmlinuz" --initrd "$out/boot/initrd.img" --append "$cmdline" \
  --out "$out/boot/sev-hashes.page.partial")
install_if_changed "$out/boot/sev-hashes.page.partial" "$out/boot/sev-hashes.page"

step "[5/5] expected SNP launch measurements, ${vcpu_counts[*]} x $vcpu_type"
measurements=()
for vcpus in "${vcpu_counts[@]}"; do
  digest=$("$hsev" measure --mode snp --vcpus "$vcpus" --vcpu-type "$vcpu_type" \
    --ovmf "$out/firmware/OVMF.fd" --kernel "$out/boot/vmlinuz" \
    --initrd "$out/boot/initrd.img" --append "$cmdline")
  measurements+=("$vcpus=$digest")
done

modules=$(sed 's|.*/||; s|\.ko.*||' <(gzip -dc "$out/boot/initrd.img" |
  cpio --quiet -i --to-stdout '*/hsev-load-order') | paste -sd' ')

OUT="$out" HASHES="$hashes" CMDLINE="$cmdline" MARKER="$marker" VCPU_TYPE="$vcpu_type" \
  MEASUREMENTS="${measurements[*]}" MODULES="$modules" \
  EDK2_VERSION="$edk2_version" GRUB_VERSION="$grub_version" \
  FIRMWARE_BUILD_TYPE="${FIRMWARE_BUILD_TYPE:-RELEASE}" \
  KERNEL_PACKAGE="$kernel_package" KERNEL_VERSION="$kernel_version" KERNEL_RELEASE="$kernel_release" \
  BUSYBOX_VERSION="$busybox_version" AGENT_SHA256="$(sha256_of "$agent")" GUEST_TOOLS="$guest_tools" \
  EXTRA_BINARIES="${EXTRA_BINARIES:-}" EXTRA_FILES="${EXTRA_FILES:-}" \
  "$python" - <<'PY'
import hashlib, json, os

out = os.environ["OUT"]
env = os.environ


def artifact(path, **extra):
    with open(os.path.join(out, path), "rb") as handle:
        digest = hashlib.sha256(handle.read()).hexdigest()
    return {"path": path, "sha256": digest, **extra}


hashes = json.loads(env["HASHES"])
page = artifact(
    "boot/sev-hashes.page",
    gpa=hashes["page_gpa"],
    table_gpa=hashes["table_gpa"],
    kernel_sha256=hashes["kernel_sha256"],
    initrd_sha256=hashes["initrd_sha256"],
    cmdline_sha256=hashes["cmdline_sha256"],
    note=(
        "The SNP_KERNEL_HASHES page QEMU writes and the SNP launch measures for this kernel, "
        "initrd and cmdline. Without SEV (TCG, simulated AMD-SP) hand it to QEMU with "
        "-device loader,file=PAGE,addr=GPA,force-raw=on and the firmware verifies the blobs "
        "against it; with a real sev-snp-guest object use kernel-hashes=on instead, never both."
    ),
)
manifest = {
    "firmware": artifact(
        "firmware/OVMF.fd",
        source=f"edk2 {env['EDK2_VERSION']} (Debian source package), OvmfPkg/AmdSev/AmdSevX64.dsc, "
        f"{env['FIRMWARE_BUILD_TYPE']} GCC5, grub.efi from Debian GRUB {env['GRUB_VERSION']}",
        kernel_hashes=True,
    ),
    "kernel": artifact(
        "boot/vmlinuz",
        package=env["KERNEL_PACKAGE"],
        version=env["KERNEL_VERSION"],
        release=env["KERNEL_RELEASE"],
    ),
    "initrd": artifact(
        "boot/initrd.img",
        busybox_static=env["BUSYBOX_VERSION"],
        modules=env["MODULES"].split(),
        agent={"path": "/usr/bin/hsev-agent", "unstripped_sha256": env["AGENT_SHA256"]},
        tools=env["GUEST_TOOLS"].split(),
        extra_binaries=env["EXTRA_BINARIES"].split(),
        extra_files=env["EXTRA_FILES"].split(),
    ),
    "cmdline": env["CMDLINE"],
    "sev_hashes": page,
    "marker": env["MARKER"],
    "qemu_args": [
        "-bios", "firmware/OVMF.fd",
        "-kernel", "boot/vmlinuz",
        "-initrd", "boot/initrd.img",
        "-append", env["CMDLINE"],
        "-device", f"loader,file=boot/sev-hashes.page,addr={hashes['page_gpa']},force-raw=on",
    ],
    "expected_measurements": {
        "snp": {
            "vmm_type": "QEMU",
            "vcpu_type": env["VCPU_TYPE"],
            "guest_features": "0x1",
            "covers": "firmware, kernel, initrd and cmdline (SNP_KERNEL_HASHES page)",
            "by_vcpus": dict(item.split("=", 1) for item in env["MEASUREMENTS"].split()),
        }
    },
}
text = json.dumps(manifest, indent=2) + "\n"
path = os.path.join(out, "manifest.json")
try:
    with open(path) as handle:
        unchanged = handle.read() == text
except FileNotFoundError:
    unchanged = False
if not unchanged:
    with open(path + ".partial", "w") as handle:
        handle.write(text)
    os.replace(path + ".partial", path)
PY

step "manifest: $out/manifest.json ($(($(date +%s) - started)) s)"
