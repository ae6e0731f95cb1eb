from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("timers", "0001_initial"),
    ]

    operations = [
        migrations.AddField(
            model_name="fire",
            name="kind",
            field=models.CharField(default="scheduled", max_length=20),
        ),
        migrations.AddField(
            model_name="fire",
            name="run_id",
            field=models.CharField(blank=True, default="", max_length=255),
        ),
        migrations.AddField(
            model_name="fire",
            name="missed",
            field=models.IntegerField(default=0),
        ),
        migrations.AddField(
            model_name="fire",
            name="deliveries",
            field=models.IntegerField(default=1),
        ),
        migrations.AddField(
            model_name="fire",
            name="started_at",
            field=models.FloatField(null=True),
        ),
        migrations.AddField(
            model_name="fire",
            name="finished_at",
            field=models.FloatField(null=True),
        ),
        migrations.AddField(
            model_name="fire",
            name="cancelled",
            field=models.BooleanField(default=False),
        ),
    ]
