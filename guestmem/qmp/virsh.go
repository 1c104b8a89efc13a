package qmp

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os/exec"
	"strings"
)

// Virsh speaks to the monitor of a libvirt domain through libvirt, with
// `virsh qemu-monitor-command`: libvirt owns the domain's QMP socket and
// serves it to no one else. Each command is one virsh process (tens of
// milliseconds), which is fine for what attach asks (the memory map, vCPU
// registers, stop and cont), not for anything on a fast path. libvirt
// marks a domain so used as tainted ("custom-monitor").
type Virsh struct {
	URI    string // libvirt connection, e.g. qemu:///system
	Domain string
	// Path is the virsh binary ("" looks up virsh).
	Path string
}

// maxVirshOutput bounds what one reply may be (info mtree -f of a big VM
// is well under it).
const maxVirshOutput = 16 << 20

func (v *Virsh) run(ctx context.Context, args ...string) ([]byte, error) {
	path := v.Path
	if path == "" {
		path = "virsh"
	}
	argv := []string{"-q"}
	if v.URI != "" {
		argv = append(argv, "-c", v.URI)
	}
	argv = append(argv, "qemu-monitor-command", v.Domain)
	cmd := exec.CommandContext(ctx, path, append(argv, args...)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("virsh: %w", err)
	}
	b, rerr := io.ReadAll(io.LimitReader(out, maxVirshOutput+1))
	err = cmd.Wait()
	if len(b) > maxVirshOutput {
		return nil, fmt.Errorf("virsh qemu-monitor-command %s: reply over %d bytes", v.Domain, maxVirshOutput)
	}
	if err != nil {
		msg := strings.TrimSpace(stderr.String())
		msg = strings.TrimPrefix(msg, "error: ")
		if msg == "" {
			msg = err.Error()
		}
		return nil, fmt.Errorf("virsh qemu-monitor-command %s: %s", v.Domain, strings.ReplaceAll(msg, "\nerror: ", ": "))
	}
	if rerr != nil {
		return nil, rerr
	}
	return b, nil
}

// Execute runs a QMP command and returns its "return" value.
func (v *Virsh) Execute(ctx context.Context, cmd string, args any) (json.RawMessage, error) {
	b, err := command(cmd, args)
	if err != nil {
		return nil, err
	}
	out, err := v.run(ctx, string(b))
	if err != nil {
		return nil, fmt.Errorf("QMP %s: %w", cmd, err)
	}
	return parseReply(cmd, out)
}

// parseReply reads a QMP reply as virsh prints it: one JSON object with
// "return" or "error".
func parseReply(cmd string, out []byte) (json.RawMessage, error) {
	var m struct {
		Return json.RawMessage `json:"return"`
		Error  *struct {
			Class string `json:"class"`
			Desc  string `json:"desc"`
		} `json:"error"`
	}
	if err := json.Unmarshal(bytes.TrimSpace(out), &m); err != nil {
		return nil, fmt.Errorf("QMP %s: reply through virsh: %w", cmd, err)
	}
	if m.Error != nil {
		return nil, fmt.Errorf("QMP %s: %s: %s", cmd, m.Error.Class, m.Error.Desc)
	}
	if m.Return == nil {
		return nil, errors.New("QMP " + cmd + ": reply through virsh has no return")
	}
	return m.Return, nil
}

// HMP runs a human monitor command (virsh --hmp) and returns its text.
func (v *Virsh) HMP(ctx context.Context, cmdline string) (string, error) {
	out, err := v.run(ctx, "--hmp", cmdline)
	if err != nil {
		return "", fmt.Errorf("HMP %q: %w", cmdline, err)
	}
	// virsh ends the monitor's text with a newline of its own.
	return strings.TrimSuffix(string(out), "\n"), nil
}

// Close does nothing: every command was a process of its own.
func (v *Virsh) Close() error { return nil }
