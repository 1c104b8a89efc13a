package policy

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"syscall"

	"github.com/kvmscope/kvmscope/internal/yamlfile"
	"github.com/kvmscope/kvmscope/tracer/ioctl"
	"golang.org/x/sys/unix"
	"gopkg.in/yaml.v3"
)

// Error is a problem in a policy file, at a line and column.
type Error struct {
	File         string
	Line, Column int
	Msg          string
}

func (e *Error) Error() string {
	file := e.File
	if file == "" {
		file = "policy"
	}
	switch {
	case e.Line == 0:
		return fmt.Sprintf("%s: %s", file, e.Msg)
	case e.Column == 0:
		return fmt.Sprintf("%s:%d: %s", file, e.Line, e.Msg)
	}
	return fmt.Sprintf("%s:%d:%d: %s", file, e.Line, e.Column, e.Msg)
}

// Load reads and checks the policy file at path.
func Load(path string) (*Policy, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	return Parse(path, b)
}

// Parse checks the policy text b; name is its file, for messages.
func Parse(name string, b []byte) (*Policy, error) {
	fail := func(n *yaml.Node, format string, a ...any) error {
		e := &Error{File: name, Msg: fmt.Sprintf(format, a...)}
		if n != nil {
			e.Line, e.Column = n.Line, n.Column
		}
		return e
	}
	var doc yaml.Node
	dec := yaml.NewDecoder(bytes.NewReader(b))
	err := dec.Decode(&doc)
	if err != nil && !errors.Is(err, io.EOF) {
		e := yamlError(name, err)
		e.Line = yamlfile.SyntaxLine(b, e.Line, e.Msg)
		return nil, e
	}
	p := &Policy{Default: Allow, Mode: Enforce, Source: name}
	if err != nil || len(doc.Content) == 0 {
		return nil, fail(nil, "empty policy (want default: and rules:)")
	}
	top := doc.Content[0]
	if top.Kind != yaml.MappingNode {
		return nil, fail(top, "a policy is a mapping with default:, mode: and rules:")
	}
	seen := map[string]bool{}
	for i := 0; i+1 < len(top.Content); i += 2 {
		k, v := top.Content[i], top.Content[i+1]
		if seen[k.Value] {
			return nil, fail(k, "%s: given twice", k.Value)
		}
		seen[k.Value] = true
		switch k.Value {
		case "default":
			a, err := parseAction(yamlfile.Scalar(v))
			if err != nil || v.Kind != yaml.ScalarNode {
				return nil, fail(v, "default: %v", yamlfile.ErrOr(err, "want an action"))
			}
			p.Default = a
		case "mode":
			switch Mode(yamlfile.Scalar(v)) {
			case Enforce, LogOnly:
				p.Mode = Mode(v.Value)
			default:
				return nil, fail(v, "mode: %q: want enforce or log", v.Value)
			}
		case "rules":
			if v.Kind != yaml.SequenceNode {
				return nil, fail(v, "rules: want a list of rules")
			}
			for _, rn := range v.Content {
				r, err := parseRule(rn, fail)
				if err != nil {
					return nil, err
				}
				p.Rules = append(p.Rules, r)
			}
		default:
			return nil, fail(k, "unknown key %q (want default, mode or rules)", k.Value)
		}
	}
	return p, nil
}

type failFunc func(n *yaml.Node, format string, a ...any) error

func parseRule(n *yaml.Node, fail failFunc) (*Rule, error) {
	if n.Kind != yaml.MappingNode {
		return nil, fail(n, "a rule is a mapping with ioctl: and action:")
	}
	r := &Rule{Line: n.Line, Column: n.Column}
	var matchNode, errnoNode *yaml.Node
	var hasAction, hasIoctl bool
	seen := map[string]bool{}
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := n.Content[i], n.Content[i+1]
		if seen[k.Value] {
			return nil, fail(k, "%s: given twice in this rule", k.Value)
		}
		seen[k.Value] = true
		switch k.Value {
		case "name":
			r.Name = yamlfile.Scalar(v)
		case "ioctl":
			hasIoctl = true
			items := []*yaml.Node{v}
			if v.Kind == yaml.SequenceNode {
				items = v.Content
			}
			for _, it := range items {
				s := yamlfile.Scalar(it)
				if it.Kind != yaml.ScalarNode || s == "" {
					return nil, fail(it, "ioctl: want a request name or number")
				}
				if s == "any" {
					if len(items) != 1 {
						return nil, fail(it, "ioctl: any cannot be listed with other requests")
					}
					r.Requests = nil
					break
				}
				req, ok := ioctl.Lookup(s)
				if !ok {
					return nil, fail(it, "ioctl: unknown request %q (a KVM name such as KVM_CREATE_VCPU, or a number)", s)
				}
				r.Requests = append(r.Requests, req.Cmd)
			}
		case "fd":
			r.FD = yamlfile.Scalar(v)
			switch ioctl.FD(r.FD) {
			case ioctl.FDKVM, ioctl.FDVM, ioctl.FDVCPU, ioctl.FDDevice:
			default:
				if !strings.HasPrefix(r.FD, "/") {
					return nil, fail(v, "fd: %q: want kvm, vm, vcpu, device or an absolute path such as /dev/vhost-net", r.FD)
				}
			}
		case "thread":
			switch t := Thread(yamlfile.Scalar(v)); t {
			case ThreadAny, ThreadMain, ThreadVCPU, ThreadIO:
				r.Thread = t
			default:
				return nil, fail(v, "thread: %q: want vcpu, main, other or any", v.Value)
			}
		case "match":
			matchNode = v
		case "action":
			a, err := parseAction(yamlfile.Scalar(v))
			if err != nil {
				return nil, fail(v, "action: %v", err)
			}
			r.Action, hasAction = a, true
		case "errno":
			errnoNode = v
		default:
			return nil, fail(k, "unknown key %q in a rule (want name, ioctl, fd, thread, match, action, errno)", k.Value)
		}
	}
	if !hasIoctl {
		return nil, fail(n, "rule %s: ioctl: missing (a request, a list of them, or any)", r.Label())
	}
	if !hasAction {
		return nil, fail(n, "rule %s: action: missing (allow, deny, log or kill)", r.Label())
	}
	if matchNode != nil {
		items := []*yaml.Node{matchNode}
		if matchNode.Kind == yaml.SequenceNode {
			items = matchNode.Content
		}
		for _, it := range items {
			if it.Kind != yaml.ScalarNode {
				return nil, fail(it, "match: want conditions written \"FIELD OP VALUE\"")
			}
			c, err := parseCond(it.Value, r.requests(), r.Requests == nil)
			if err != nil {
				return nil, fail(it, "%v", err)
			}
			c.Line, c.Column = it.Line, it.Column
			r.Match = append(r.Match, c)
		}
	}
	if errnoNode != nil {
		if r.Action != Deny {
			return nil, fail(errnoNode, "errno: only a deny rule has one")
		}
		e, err := parseErrno(yamlfile.Scalar(errnoNode))
		if err != nil {
			return nil, fail(errnoNode, "errno: %v", err)
		}
		r.Errno = e
	} else if r.Action == Deny {
		r.Errno = DefaultErrno
	}
	return r, nil
}

func parseErrno(s string) (syscall.Errno, error) {
	for e := syscall.Errno(1); e < 4096; e++ {
		if unix.ErrnoName(e) == s {
			return e, nil
		}
	}
	return 0, fmt.Errorf("unknown errno %q (want a name such as EPERM or EINVAL)", s)
}

// yamlError turns yaml.v3's "yaml: line N: msg" into an Error.
func yamlError(name string, err error) *Error {
	line, msg := yamlfile.Split(err)
	return &Error{File: name, Line: line, Msg: msg}
}
