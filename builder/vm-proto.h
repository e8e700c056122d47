#ifndef IB_VM_PROTO_H
#define IB_VM_PROTO_H

/*
 * What the builder (builder/vm.c) and the guest agent (init/agent.c: the
 * VM's PID 1, ib-init started with ib.agent=1) say to each other over the
 * virtio-serial port named IB_VM_PORT.  Header only: the agent links
 * nothing of the builder.
 *
 * Every message is a frame: one type byte, a u32 length (little endian),
 * then that many bytes.  A string inside a payload is a u32 length and its
 * bytes; a u32 or i32 is four bytes, little endian.
 *
 * guest -> builder
 *   H  the agent is up: string kernel release
 *   O  output of the step's commands, as it comes (bytes)
 *   S  the step ended: u32 what (IB_VM_DONE_*), i32 command index (-1:
 *      none), i32 wait status, string message; with IB_VM_DONE_OK and
 *      IB_VM_DONE_FAILED the scratch disk is read-only and clean, the
 *      step's upper at /s<step>/upper
 *
 * builder -> guest
 *   R  run a step: u32 step, u32 flags (IB_VM_RUN_*), u64 wall clock
 *      (ns since the epoch), string resolv.conf ("" keeps the image's),
 *      u32 ncmds, each u32 argc and argc strings, u32 nenv and nenv
 *      strings (KEY=VALUE)
 *   Q  power off
 *
 * The disks (virtio-blk, found by serial):
 *   ib-lower    read-only: the merged layers below the step, as ext4; the
 *               builder writes it again before each step (the agent drops
 *               its cached blocks first)
 *   ib-scratch  the build's scratch ext4: s<step>/upper and work, and
 *               ap/upper and work (the build's own apt lists)
 *   ib-lists    read-only: the shared apt lists, as ext4, written afresh
 *               before each step that asks for them
 */

#include <stdint.h>

#define IB_VM_PORT		"ib.ctl"
#define IB_VM_SERIAL_LOWER	"ib-lower"
#define IB_VM_SERIAL_SCRATCH	"ib-scratch"
#define IB_VM_SERIAL_LISTS	"ib-lists"

#define IB_VM_MSG_HELLO		'H'
#define IB_VM_MSG_OUTPUT	'O'
#define IB_VM_MSG_STATUS	'S'
#define IB_VM_MSG_RUN		'R'
#define IB_VM_MSG_QUIT		'Q'

/* a frame's payload is at most this long */
#define IB_VM_FRAME_MAX		(64u << 20)
/* output frames carry at most this much */
#define IB_VM_OUTPUT_CHUNK	65536u

#define IB_VM_RUN_APT_LISTS	1u  /* the build's view of the apt lists at /var/lib/apt/lists */

#define IB_VM_DONE_OK		0u
#define IB_VM_DONE_FAILED	1u  /* a command failed: index and wait status */
#define IB_VM_DONE_SETUP	2u  /* the step could not start: message */

#define IB_VM_HOSTNAME		"imagebuilder"

#endif
