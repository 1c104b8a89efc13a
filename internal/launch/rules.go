package launch

import (
	"context"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/kvmscope/kvmscope/internal/eventlog"
	"github.com/kvmscope/kvmscope/rules"
	"github.com/kvmscope/kvmscope/session"
	"github.com/rs/zerolog"
)

// rulesWatch keeps a session's rule base in step with its file.
type rulesWatch struct {
	path   string
	sess   *session.Session
	events *eventlog.Log
	log    zerolog.Logger

	mu   sync.Mutex // one reload at a time
	seen fileStamp
}

// fileStamp is what tells a changed file: an editor that writes a new
// file and renames it over the old one changes the inode, one that
// writes in place the size or the modification time.
type fileStamp struct {
	ino, size uint64
	mtime     time.Time
}

func stampOf(path string) (fileStamp, error) {
	st, err := os.Stat(path)
	if err != nil {
		return fileStamp{}, err
	}
	var ino uint64
	if sys, ok := st.Sys().(*syscall.Stat_t); ok {
		ino = sys.Ino
	}
	return fileStamp{ino: ino, size: uint64(st.Size()), mtime: st.ModTime()}, nil
}

// reload reads the file again. A file that does not parse (or cannot be
// read) keeps the rules in force: the error, one line with the file's
// line number, is logged and returned.
func (w *rulesWatch) reload(why string) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.seen, _ = stampOf(w.path)
	set, err := rules.Load(w.path)
	if err != nil {
		w.log.Error().Str("rules", w.path).Str("why", why).Msgf("rules not reloaded, the previous ones stay: %v", err)
		if w.events != nil {
			w.events.Append("rules_error", map[string]string{"file": w.path, "error": err.Error(), "why": why})
		}
		return err
	}
	w.sess.SetRules(set)
	w.log.Info().Str("rules", w.path).Str("why", why).Int("rules", len(set.Rules)).Msg("rules reloaded")
	if w.events != nil {
		w.events.Append("rules_reloaded", map[string]any{"file": w.path, "rules": len(set.Rules), "why": why})
	}
	return nil
}

// run polls the file every interval until ctx ends, reloading it when it
// changed.
func (w *rulesWatch) run(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		st, err := stampOf(w.path)
		w.mu.Lock()
		changed := err == nil && st != w.seen
		w.mu.Unlock()
		if changed {
			w.reload("file changed")
		}
	}
}
