package main

import (
	"strings"
)

// qemuArgs is what kvmscope needs to know from QEMU's command line. It never
// changes how QEMU parses it.
type qemuArgs struct {
	name      string // -name guest=NAME or -name NAME
	daemonize bool
	// probe is set for runs that print something and exit without a VM
	// (-version, -help, "help" listings): they pass straight through.
	probe bool
	// accels lists the accelerators QEMU may use, in its order of
	// preference (-accel, -machine accel=, or QEMU's default: tcg).
	accels []string
}

// option returns the value of a QEMU option: QEMU accepts "-opt" and
// "--opt", with the value as the next argument.
func parseQEMUArgs(args []string) qemuArgs {
	var q qemuArgs
	for i := 0; i < len(args); i++ {
		a := args[i]
		if strings.HasPrefix(a, "--") {
			a = a[1:]
		}
		val := ""
		if i+1 < len(args) {
			val = args[i+1]
		}
		switch a {
		case "-version", "-help", "-h":
			q.probe = true
		case "-daemonize":
			q.daemonize = true
		case "-name":
			q.name = optValue(val, "guest")
			i++
		case "-accel":
			q.accels = append(q.accels, optValue(val, "accel"))
			i++
		case "-enable-kvm":
			q.accels = append(q.accels, "kvm")
		case "-machine", "-M":
			if acc := optKey(val, "accel"); acc != "" {
				q.accels = append(q.accels, strings.Split(acc, ":")...)
			}
			if optValue(val, "type") == "help" || val == "?" {
				q.probe = true
			}
			i++
		default:
			// "-cpu help", "-device help" and the like list and exit.
			if strings.HasPrefix(a, "-") && (val == "help" || val == "?") {
				q.probe = true
			}
		}
	}
	if len(q.accels) == 0 {
		q.accels = []string{"tcg"}
	}
	return q
}

// optValue returns the implied first value of a QEMU option string
// ("NAME,k=v" or "guest=NAME,k=v"), or the value of key.
func optValue(s, key string) string {
	parts := splitOpts(s)
	if len(parts) == 0 {
		return ""
	}
	if v := optKey(s, key); v != "" {
		return v
	}
	if !strings.Contains(parts[0], "=") {
		return parts[0]
	}
	return ""
}

// optKey returns the value of key=VALUE in a QEMU option string.
func optKey(s, key string) string {
	for _, p := range splitOpts(s) {
		if k, v, ok := strings.Cut(p, "="); ok && k == key {
			return v
		}
	}
	return ""
}

// splitOpts splits on commas; QEMU escapes a literal comma as ",,".
func splitOpts(s string) []string {
	var out []string
	var cur strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == ',' {
			if i+1 < len(s) && s[i+1] == ',' {
				cur.WriteByte(',')
				i++
				continue
			}
			out = append(out, cur.String())
			cur.Reset()
			continue
		}
		cur.WriteByte(s[i])
	}
	return append(out, cur.String())
}

// mayUseTCG reports whether QEMU may end up running without KVM.
func (q qemuArgs) mayUseTCG() bool {
	for _, a := range q.accels {
		if a == "tcg" {
			return true
		}
	}
	return false
}

// mayUseKVM reports whether QEMU may use KVM.
func (q qemuArgs) mayUseKVM() bool {
	for _, a := range q.accels {
		if a == "kvm" {
			return true
		}
	}
	return false
}
