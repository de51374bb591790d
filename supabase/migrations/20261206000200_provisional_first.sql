-- Provisional cells heal first (issue 30, point 2). The nightly run asks every site for its own
-- days only; a stored value that is not final (Search Console had not finalised the day, a Matomo
-- 0 its raw log did not confirm) is asked again for its site by the heal plan, ahead of the holes
-- that hold nothing. analytics_holes says which holes hold one: each hole gains "provisional"
-- (true when a stored, not final value of its source lies in it). Only the function changes.
create or replace function public.analytics_holes(
    p_window_from date, p_to date, p_gsc_from date, p_history_from date, p_site bigint default null,
    p_deployed text default 'deployed'
)
returns jsonb
language sql stable
set search_path = public
as $$
    with wanted as (
        select * from analytics_wanted(p_window_from, p_to, p_gsc_from, p_history_from, p_site, p_deployed)
        where first_day <= last_day
    ),
    finals as (
        select w.site_id, w.source, a.date,
               lag(a.date) over (partition by w.site_id, w.source order by a.date) as previous
        from wanted w
        join daily_analytics a on a.site_id = w.site_id and a.date between w.first_day and w.last_day
        where case w.source when 'matomo' then a.matomo_final else a.gsc_final end
    ),
    holes as (
        select f.site_id, f.source, coalesce(f.previous + 1, w.first_day) as first_day, f.date - 1 as last_day
        from finals f join wanted w using (site_id, source)
        where f.date - 1 >= coalesce(f.previous + 1, w.first_day)
        union all
        select w.site_id, w.source, coalesce(l.newest + 1, w.first_day), w.last_day
        from wanted w
        left join (select site_id, source, max(date) as newest from finals group by 1, 2) l
            using (site_id, source)
        where coalesce(l.newest + 1, w.first_day) <= w.last_day
    )
    select coalesce(jsonb_agg(jsonb_build_object('site_id', h.site_id, 'source', h.source,
                                                 'from', h.first_day, 'to', h.last_day,
                                                 'provisional', exists (
            select 1 from daily_analytics a
            where a.site_id = h.site_id and a.date between h.first_day and h.last_day
              and not case h.source when 'matomo' then a.matomo_final else a.gsc_final end))
                              order by h.first_day, h.site_id, h.source), '[]'::jsonb)
    from holes h
$$;
