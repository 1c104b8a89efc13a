package launch

import (
	"context"
	"errors"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"github.com/kvmscope/kvmscope/api"
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

// Judging is what the guest is judged by, and when: run's and attach's.
type Judging struct {
	// Rules is the rule base (nil: the built-in one), loaded from
	// RulesPath, which is watched: reloaded when it changes, on SIGHUP to
	// kvmscope, and on POST /v1/rules/reload.
	Rules     *rules.Set
	RulesPath string
	// Scan is the scan policy; with a positive Scan.Interval the guest
	// is scanned and judged on it, keeping the latest table for the API.
	Scan session.ScanPolicy
}

// start sets up the judging of the VM server serves (QEMU qemuPID): its
// session's rule base, dispatch baseline and event log, the watch of the
// rule file and the scheduled scans, until ctx ends. It returns the watch
// (nil without a rule file), for SIGHUP.
func (j Judging) start(ctx context.Context, server *api.Server, qemuPID int, log zerolog.Logger) *rulesWatch {
	sess := server.Session
	sess.SetBaseline(server.BaselinePath)
	if server.Events != nil {
		sess.SetEvents(server.Events)
	}
	if j.Rules != nil {
		sess.SetRules(j.Rules)
	}
	var watch *rulesWatch
	if j.RulesPath != "" {
		watch = &rulesWatch{path: j.RulesPath, sess: sess, events: server.Events, log: log}
		watch.seen, _ = stampOf(j.RulesPath)
		server.ReloadRules = func() error { return watch.reload("API request") }
		go watch.run(ctx, time.Second)
	}
	if j.Scan.Interval > 0 {
		pol := j.Scan
		pol.VMLoad = session.VMLoad(qemuPID)
		go sess.Run(ctx, pol, func(err error) {
			var partial *session.PartialScanError
			if errors.As(err, &partial) {
				log.Info().Err(err).Msg("scheduled scan")
				return
			}
			log.Debug().Err(err).Msg("scheduled scan")
		})
	}
	return watch
}

// stopSignals handles the signals of a process that serves an API until
// told to stop: SIGHUP reloads the rule file, when there is one (as for a
// daemon); SIGINT and SIGTERM come out of the channel.
func stopSignals(watch *rulesWatch) <-chan os.Signal {
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	stop := make(chan os.Signal, 1)
	go func() {
		for s := range sigs {
			if s != syscall.SIGHUP {
				select {
				case stop <- s:
				default:
				}
				continue
			}
			if watch != nil {
				watch.reload("SIGHUP")
			}
		}
	}()
	return stop
}
