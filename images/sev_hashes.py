#!/usr/bin/env python3
"""Writes the SEV kernel-hashes page of a direct-boot launch, and says where
it goes in guest memory.

An SEV-SNP launch with QEMU's `kernel-hashes=on` puts a table of the sha256
of the kernel, the initrd and the command line into the firmware's
SNP_KERNEL_HASHES page (found through the OVMF footer table) and measures
that page; edk2's AmdSev firmware then checks the blobs it gets over fw_cfg
against the table and refuses to boot on any mismatch. The page written here
is byte for byte the one QEMU builds and sev-snp-measure measures
(sev_hashes.py, SevHashes.construct_page).

Without SEV (QEMU TCG here, with the simulated AMD Secure Processor) QEMU
writes no table, so the host hands this page to QEMU itself:
    -device loader,file=PAGE,addr=GPA,force-raw=on
and the firmware verifies the kernel, initrd and cmdline exactly as it
would in an SEV-SNP guest.

Standard library only. Prints a JSON object: page_gpa, table_gpa, sha256s.
"""

import argparse
import hashlib
import json
import struct
import sys
import uuid

FOOTER_TABLE_GUID = "96b582de-1fb2-45f7-baea-a366c55a082d"
SEV_HASH_TABLE_RV_GUID = "7255371f-3a3b-4b04-927b-1da6efa8d454"
SEV_METADATA_OFFSET_GUID = "dc886566-984a-4798-a75e-5585a7bf67cc"
SECTION_SNP_KERNEL_HASHES = 0x10

HASH_TABLE_HEADER_GUID = "9438d606-4f22-4cc9-b479-a793d411fd21"
KERNEL_ENTRY_GUID = "4de79437-abd2-427f-b835-d5b172d2045b"
INITRD_ENTRY_GUID = "44baf731-3a2f-4bd7-9af1-41e29169781d"
CMDLINE_ENTRY_GUID = "97d02dd8-bd20-4c94-aa78-e7714d36ab2a"

PAGE = 4096


def guid_le(text):
    return uuid.UUID(text).bytes_le


def footer_entries(firmware):
    """The OVMF footer GUIDed table: {guid: data}, as QEMU and
    sev-snp-measure read it (it ends 32 bytes before the end of the image)."""
    end = len(firmware) - 32
    header_len = 18  # UINT16 length + GUID
    if end < header_len or firmware[end - 16:end] != guid_le(FOOTER_TABLE_GUID):
        raise SystemExit("firmware has no OVMF footer table")
    (table_len,) = struct.unpack_from("<H", firmware, end - header_len)
    start = end - table_len
    entries = {}
    cursor = end - header_len
    while cursor > start:
        guid = uuid.UUID(bytes_le=firmware[cursor - 16:cursor])
        (entry_len,) = struct.unpack_from("<H", firmware, cursor - header_len)
        if entry_len < header_len or cursor - entry_len < start:
            raise SystemExit("malformed OVMF footer table")
        entries[str(guid)] = firmware[cursor - entry_len:cursor - header_len]
        cursor -= entry_len
    return entries


def kernel_hashes_section(firmware, entries):
    """(gpa, size) of the SNP_KERNEL_HASHES section of the SEV metadata."""
    if SEV_METADATA_OFFSET_GUID not in entries:
        raise SystemExit("firmware has no SEV metadata")
    (offset,) = struct.unpack_from("<I", entries[SEV_METADATA_OFFSET_GUID], 0)
    base = len(firmware) - offset
    signature, _length, _version, count = struct.unpack_from("<4sIII", firmware, base)
    if signature != b"ASEV":
        raise SystemExit("bad SEV metadata signature")
    for index in range(count):
        gpa, size, kind = struct.unpack_from("<III", firmware, base + 16 + 12 * index)
        if kind == SECTION_SNP_KERNEL_HASHES:
            return gpa, size
    raise SystemExit(
        "firmware has no SNP_KERNEL_HASHES section: it cannot measure a kernel "
        "(build edk2's OvmfPkg/AmdSev/AmdSevX64.dsc, as images/firmware.sh does)"
    )


def sha256_file(path):
    digest = hashlib.sha256()
    if path:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.digest()


def hash_table(kernel, initrd, append):
    cmdline = (append.encode() if append else b"") + b"\0"
    entry = struct.Struct("<16sH32s")
    entries = b"".join(
        entry.pack(guid_le(guid), entry.size, digest)
        for guid, digest in (
            (CMDLINE_ENTRY_GUID, hashlib.sha256(cmdline).digest()),
            (INITRD_ENTRY_GUID, sha256_file(initrd)),
            (KERNEL_ENTRY_GUID, sha256_file(kernel)),
        )
    )
    table = guid_le(HASH_TABLE_HEADER_GUID) + struct.pack("<H", 18 + len(entries)) + entries
    return table + bytes(-len(table) % 16)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ovmf", required=True)
    parser.add_argument("--kernel", required=True)
    parser.add_argument("--initrd", default="")
    parser.add_argument("--append", default="")
    parser.add_argument("--out", required=True, help="where to write the 4 KiB page")
    args = parser.parse_args()

    with open(args.ovmf, "rb") as handle:
        firmware = handle.read()
    entries = footer_entries(firmware)
    if SEV_HASH_TABLE_RV_GUID not in entries:
        raise SystemExit("firmware has no SEV hashes table entry")
    table_gpa, table_size = struct.unpack_from("<II", entries[SEV_HASH_TABLE_RV_GUID], 0)
    page_gpa, page_size = kernel_hashes_section(firmware, entries)
    offset = table_gpa - page_gpa
    table = hash_table(args.kernel, args.initrd, args.append)
    if page_size != PAGE or not 0 <= offset < PAGE or len(table) > table_size or offset + len(table) > PAGE:
        raise SystemExit("the SEV hashes table does not fit the SNP_KERNEL_HASHES page")
    page = bytes(offset) + table + bytes(PAGE - offset - len(table))
    with open(args.out, "wb") as handle:
        handle.write(page)
    json.dump(
        {
            "page_gpa": f"0x{page_gpa:x}",
            "table_gpa": f"0x{table_gpa:x}",
            "kernel_sha256": sha256_file(args.kernel).hex(),
            "initrd_sha256": sha256_file(args.initrd).hex(),
            "cmdline_sha256": hashlib.sha256(args.append.encode() + b"\0").hexdigest(),
        },
        sys.stdout,
    )
    print()


if __name__ == "__main__":
    main()
