package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"syscall"
	"time"
)

// Client talks to a kvmscope API socket.
type Client struct {
	Socket string
	http   *http.Client
}

// NewClient returns a client for the socket at path.
func NewClient(path string) *Client {
	return &Client{Socket: path, http: &http.Client{
		Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "unix", path)
			},
		},
		Timeout: 60 * time.Second,
	}}
}

// WithTimeout returns a client of the same socket whose requests may take
// up to d each (NewClient's take at most 60 s), for requests the server
// bounds later than that: an action inside the guest (ActionTimeout).
func (c *Client) WithTimeout(d time.Duration) *Client {
	h := *c.http
	h.Timeout = d
	return &Client{Socket: c.Socket, http: &h}
}

// Get fetches path (e.g. "/v1/vm") and decodes JSON into v.
func (c *Client) Get(ctx context.Context, path string, v any) error {
	body, err := c.GetRaw(ctx, path)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(body, v); err != nil {
		return fmt.Errorf("decode reply of %s: %w", path, err)
	}
	return nil
}

// GetRaw fetches path and returns the body.
func (c *Client) GetRaw(ctx context.Context, path string) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://kvmscope"+path, nil)
	if err != nil {
		return nil, err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, c.dialError(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, MaxMemoryRead+1<<20))
	if err != nil {
		return nil, fmt.Errorf("read reply of %s: %w", path, err)
	}
	if resp.StatusCode != http.StatusOK {
		var e Error
		if json.Unmarshal(body, &e) == nil && e.Error != "" {
			return nil, errors.New(e.Error)
		}
		return nil, fmt.Errorf("%s: %s", path, resp.Status)
	}
	return body, nil
}

// dialError turns a transport error into one clear sentence, which still
// unwraps to the error (errors.Is(err, syscall.ENOENT) holds).
func (c *Client) dialError(err error) error {
	msg := fmt.Sprintf("cannot reach kvmscope API at %s: %v", c.Socket, err)
	switch {
	case errors.Is(err, os.ErrNotExist):
		msg = fmt.Sprintf("cannot reach kvmscope API at %s: no such socket (is 'kvmscope run' running?)", c.Socket)
	case errors.Is(err, syscall.ECONNREFUSED):
		msg = fmt.Sprintf("cannot reach kvmscope API at %s: connection refused (stale socket?)", c.Socket)
	case errors.Is(err, syscall.EACCES), errors.Is(err, os.ErrPermission):
		msg = fmt.Sprintf("cannot reach kvmscope API at %s: permission denied (only root and the VM's owner may use it)", c.Socket)
	}
	return &reachError{msg: msg, err: err}
}

// reachError is a transport error said in one sentence.
type reachError struct {
	msg string
	err error
}

func (e *reachError) Error() string { return e.msg }
func (e *reachError) Unwrap() error { return e.err }

// SystemDir is the socket directory of VMs run as root and, unless its
// config says otherwise, of the libvirt wrapper's domains.
const SystemDir = "/run/kvmscope"

// DefaultDir is where `kvmscope run` puts sockets: $XDG_RUNTIME_DIR/kvmscope
// for a user with a runtime dir, else SystemDir.
func DefaultDir() string {
	if d := os.Getenv("XDG_RUNTIME_DIR"); d != "" {
		return filepath.Join(d, "kvmscope")
	}
	return SystemDir
}

// Open fetches path and returns the body as a stream with its length (-1
// when unknown), for large replies such as /v1/dump. The caller closes it.
func (c *Client) Open(ctx context.Context, path string) (io.ReadCloser, int64, error) {
	resp, err := c.Response(ctx, path)
	if err != nil {
		return nil, 0, err
	}
	return resp.Body, resp.ContentLength, nil
}

// Response fetches path and returns the reply, headers and all, once its
// status says success (an error reply becomes the error). The caller
// closes its Body.
func (c *Client) Response(ctx context.Context, path string) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://kvmscope"+path, nil)
	if err != nil {
		return nil, err
	}
	// No overall timeout: a dump of a large guest takes a while; ctx bounds it.
	hc := &http.Client{Transport: c.http.Transport}
	resp, err := hc.Do(req)
	if err != nil {
		return nil, c.dialError(err)
	}
	if resp.StatusCode != http.StatusOK {
		defer resp.Body.Close()
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<16))
		var e Error
		if json.Unmarshal(body, &e) == nil && e.Error != "" {
			return nil, errors.New(e.Error)
		}
		return nil, fmt.Errorf("%s: %s", path, resp.Status)
	}
	return resp, nil
}

// Put sends body to path (PUT /v1/memory?gpa=A); a reply other than 2xx
// is an error with the server's message.
func (c *Client) Put(ctx context.Context, path string, body []byte) error {
	return c.send(ctx, http.MethodPut, path, body, nil)
}

// Post asks for an action (POST /v1/integrity/restore) and decodes the
// JSON reply into v.
func (c *Client) Post(ctx context.Context, path string, v any) error {
	return c.send(ctx, http.MethodPost, path, nil, v)
}

// PostJSON sends in as JSON to path (POST /v1/integrity/guard) and decodes
// the JSON reply into out.
func (c *Client) PostJSON(ctx context.Context, path string, in, out any) error {
	return c.sendJSON(ctx, http.MethodPost, path, in, out)
}

func (c *Client) sendJSON(ctx context.Context, method, path string, in, out any) error {
	body, err := json.Marshal(in)
	if err != nil {
		return err
	}
	return c.send(ctx, method, path, body, out)
}

func (c *Client) send(ctx context.Context, method, path string, body []byte, v any) error {
	req, err := http.NewRequestWithContext(ctx, method, "http://kvmscope"+path, bytes.NewReader(body))
	if err != nil {
		return err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return c.dialError(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		var e Error
		json.NewDecoder(resp.Body).Decode(&e)
		return fmt.Errorf("%s %s: %s: %s", method, path, resp.Status, e.Error)
	}
	if v != nil {
		return json.NewDecoder(resp.Body).Decode(v)
	}
	return nil
}
